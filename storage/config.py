"""`StorageConfig`: where files live and how to reach them, the same keys in every config section.

`data`, `train` and `eval` each inherit these fields (`data.s3_endpoint_url`, `train.s3_region`, ...),
so the three sections speak one dialect. Credentials are not among them: they come from the
standard AWS provider chain (environment variables with a session token, the shared
config/credentials files and `AWS_PROFILE`, web identity / IRSA, instance metadata), resolved by
the libraries themselves (botocore for fsspec/s3fs, the AWS SDK inside pyarrow).
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

STORAGE_FIELDS = ("storage_options", "s3_endpoint_url", "s3_region")


class StorageConfig(BaseModel):
    """How to reach remote paths (s3://, gs://, ...) of one config section. Local paths ignore it."""

    model_config = ConfigDict(extra="forbid")

    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for remote paths (e.g. s3fs's anon, requester_pays, config_kwargs); credentials "
        "come from the standard AWS chain (environment, AWS_PROFILE, web identity, instance role)",
    )
    s3_endpoint_url: Optional[str] = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, ...); default: the AWS configuration's "
        "(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / the profile), else AWS itself",
    )
    s3_region: Optional[str] = Field(
        None, description="S3 region; default: the AWS configuration's (AWS_REGION, the profile), else the bucket's own"
    )

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"{value!r} must be a URL with its scheme, e.g. http://127.0.0.1:9000 or https://minio.example"
            )
        return value.rstrip("/") if value else value

    def storage(self) -> "StorageConfig":
        """Just the storage fields (a section that inherits them carries much more)."""
        return StorageConfig(**{name: getattr(self, name) for name in STORAGE_FIELDS})
