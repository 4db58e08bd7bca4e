"""The one typed settings object, read from ``OVERREAD_*`` environment variables."""

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OVERREAD_")

    database_url: str = "sqlite:///./overread.db"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    mllp_host: str = "127.0.0.1"
    mllp_port: int = 2575
    #: MLLP limits (docs/reliability.md, "HL7 over MLLP"): a block's bytes, a message's segments,
    #: seconds a connection may stay silent, open connections per peer address and in total.
    mllp_max_message_size: int = 10 * 1024 * 1024
    mllp_max_segments: int = 10_000
    mllp_idle_timeout: float = 60.0
    mllp_max_connections: int = 256
    mllp_max_connections_per_address: int = 64
    dicom_ae_title: str = "OVERREAD"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    #: Where retrieved and pushed DICOM instances are kept.
    image_store: Path = Path("./images")
    config: Path | None = None
    #: Absolute base URL the server names itself by in Location headers and Bundle links.
    #: Empty means: derive it from each request.
    public_base_url: str = ""


@lru_cache
def get_settings() -> Settings:
    return Settings()
