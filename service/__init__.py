"""The front door: owns the gRPC wire contract."""
