"""The web page and REST API (``ctguard serve``)."""
