"""Provider wire formats: one module per format, each turning requests and responses into CallInfo and Usage."""
