"""The ``OVERREAD_CONFIG`` YAML file: PACS peers, image linking, HL7 senders and destinations.

The shape of ARCHITECTURE.md ("Interfaces other systems and tests rely on") plus
``hl7.senders``, the per-sender mapping settings an integration engineer adapts a new
sending system with, without code:

    hl7:
      senders:
        - sending_application: EPIC        # MSH-3; "" or absent = any
          sending_facility: STMARYS        # MSH-4; "" or absent = any
          identifier_systems:              # assigning authority (CX-4 / EI-2) → identifier system
            STMARYS: urn:oid:2.16.840.1.113883.3.72.5.9.1.2
          default_system: urn:oid:2.16.840.1.113883.3.72.5.9.1
          timezone: Europe/Stockholm       # for times sent without an offset

The first sender entry that matches a message's MSH-3 and MSH-4 applies. ``linking`` sets
how patiently the image-linking job tries (defaults shown)::

    linking:
      max_attempts: 10             # then images-not-found / images-unavailable on the Task
      first_retry_seconds: 30      # doubling after each attempt ...
      max_retry_seconds: 3600      # ... up to this
      timeout_seconds: 30          # of one DICOM or DICOMweb exchange
"""

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mappings.sender import SenderConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


class PacsPeer(_Strict):
    name: str
    ae_title: str
    host: str
    port: int
    qido_url: str | None = None
    retrieve: Literal["c-move", "c-get", "wado-rs", "none"] = "c-move"
    #: IANA zone of the PACS's local dates and times, for answers without TimezoneOffsetFromUTC.
    timezone: str | None = None


class Linking(_Strict):
    max_attempts: Annotated[int, Field(ge=1)] = 10
    first_retry_seconds: Annotated[float, Field(ge=0)] = 30
    max_retry_seconds: Annotated[float, Field(ge=0)] = 3600
    timeout_seconds: Annotated[float, Field(gt=0)] = 30


class Destination(_Strict):
    name: str
    host: str
    port: int
    sending_facility: str = ""


class Sender(_Strict):
    sending_application: str = ""
    sending_facility: str = ""
    identifier_systems: dict[str, str] = Field(default_factory=dict)
    default_system: str | None = None
    timezone: str = "UTC"

    def matches(self, application: str, facility: str) -> bool:
        return self.sending_application in ("", application) and self.sending_facility in ("", facility)


class Hl7(_Strict):
    senders: list[Sender] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)


class OverreadConfig(_Strict):
    pacs: list[PacsPeer] = Field(default_factory=list)
    linking: Linking = Linking()
    hl7: Hl7 = Field(default_factory=Hl7)

    def sender(self, application: str, facility: str) -> SenderConfig | None:
        """The mapping settings of the first sender entry matching MSH-3 and MSH-4, if any."""
        for sender in self.hl7.senders:
            if sender.matches(application, facility):
                return SenderConfig(
                    identifier_systems=sender.identifier_systems,
                    default_system=sender.default_system,
                    timezone=sender.timezone,
                )
        return None


class ConfigError(ValueError):
    pass


def load(path: Path | None) -> OverreadConfig:
    """Read and check the file; an empty configuration when there is none."""
    if path is None:
        return OverreadConfig()
    try:
        return OverreadConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"OVERREAD_CONFIG {path}: {exc}") from exc
