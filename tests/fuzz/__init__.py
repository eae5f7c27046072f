"""Property-based tests of the service against an untrusted party on raw NATS connections."""
