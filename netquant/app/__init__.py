"""The Deep Network Quantizer web app (local server, vendored assets). Imported only on use."""
