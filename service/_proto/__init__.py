"""Generated from proto/attribution/v1/attribution.proto: do not edit."""
