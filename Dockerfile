FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY overread overread
COPY fhir_server fhir_server
COPY cases cases
COPY hl7_bridge hl7_bridge
COPY dicom_bridge dicom_bridge
COPY mappings mappings
COPY conformance conformance
RUN pip install --no-cache-dir . && useradd --system --create-home --home-dir /var/lib/overread overread
# Not root: the server writes only its data directory (docs/security.md, "Containers").
USER overread
WORKDIR /var/lib/overread
RUN mkdir images
# A listener must bind the container's own interface to be published at all (loopback inside the
# container is unreachable from outside it); which host address a port is published on is the
# run's choice (docker-compose.yml: 127.0.0.1 only). Beyond loopback, access control is on.
ENV OVERREAD_HTTP_HOST=0.0.0.0 \
    OVERREAD_MLLP_HOST=0.0.0.0 \
    OVERREAD_DICOM_HOST=0.0.0.0 \
    OVERREAD_AUTH=smart \
    OVERREAD_DATABASE_URL=sqlite:////var/lib/overread/overread.db \
    OVERREAD_IMAGE_STORE=/var/lib/overread/images
# FHIR (HTTP), HL7 v2 (MLLP), DICOM (the Storage SCP); nothing else listens.
EXPOSE 8080 2575 11112
CMD ["sh", "-c", "overread db upgrade && overread serve"]
