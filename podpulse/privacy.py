"""The privacy floor every published figure keeps."""

__all__ = ["MIN_K"]

# No published cell (report, API, metric) describes fewer devices than this; a caller may raise it,
# never lower it.
MIN_K = 10
