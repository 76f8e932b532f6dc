"""Real in-thread servers for tests: an HTTP file server and an S3 endpoint (moto)."""
