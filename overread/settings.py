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
    dicom_ae_title: str = "OVERREAD"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    #: Where retrieved and pushed DICOM instances are kept.
    image_store: Path = Path("./images")
    #: The Storage SCP's limits (docs/reliability.md, "DICOM"): associations at once (from their
    #: A-ASSOCIATE-RQ), connections still without one, seconds to send it (ARTIM) and of silence in an
    #: association, bytes of one data set and of all held while they arrive, free bytes the store keeps.
    dicom_max_associations: int = 32
    dicom_max_pending: int = 64
    dicom_associate_timeout: float = 10.0
    dicom_idle_timeout: float = 60.0
    dicom_max_data_set_bytes: int = 512 << 20
    dicom_max_buffered_bytes: int = 1 << 30
    image_store_min_free_bytes: int = 1 << 30
    config: Path | None = None
    #: Absolute base URL the server names itself by in Location headers and Bundle links.
    #: Empty means: derive it from each request.
    public_base_url: str = ""


@lru_cache
def get_settings() -> Settings:
    return Settings()
