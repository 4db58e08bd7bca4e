FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY overread overread
COPY fhir_server fhir_server
COPY hl7_bridge hl7_bridge
COPY dicom_bridge dicom_bridge
COPY mappings mappings
COPY conformance conformance
RUN pip install --no-cache-dir .
ENV OVERREAD_HTTP_HOST=0.0.0.0
EXPOSE 8080 2575 11112
CMD ["sh", "-c", "overread db upgrade && overread serve"]
