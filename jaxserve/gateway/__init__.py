"""The Gateway (`jaxserve gateway`) and the worker side of its protocol (docs/gateway.md)."""
