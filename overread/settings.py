"""The one typed settings object, read from ``OVERREAD_*`` environment variables."""

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from fhir_server.search_limits import SearchLimits


class Settings(BaseSettings):
    # A nested group's fields by OVERREAD_<GROUP>__<FIELD>, e.g. OVERREAD_SEARCH__TIMEOUT.
    model_config = SettingsConfigDict(env_prefix="OVERREAD_", env_nested_delimiter="__")

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
    config: Path | None = None
    #: Absolute base URL the server names itself by in Location headers and Bundle links.
    #: Empty means: derive it from each request.
    public_base_url: str = ""
    #: What one search may ask of the database (docs/reliability.md, "Search and the index").
    search: SearchLimits = SearchLimits()


@lru_cache
def get_settings() -> Settings:
    return Settings()
