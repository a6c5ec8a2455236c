"""The loopback S3 proxy moved to `fruit_assets_dev.s3_proxy` (it injects faults too now); this name
stays for the listing benchmark and its tests."""

from fruit_assets_dev.s3_proxy import CountingProxy, request_kind

__all__ = ["CountingProxy", "request_kind"]
