"""The per-prediction audit log: the writer (log.py), the record format (records.py), `audit verify` (verify.py)."""
from service.audit.log import AuditConfig, AuditLog
from service.audit.records import (INPUTS_DIR, LOG_NAME, RECORD_FIELDS, SCHEMA_VERSION, input_ref, log_files,
                                   map_count, record_lines, save_array, should_audit)

__all__ = ["AuditConfig", "AuditLog", "INPUTS_DIR", "LOG_NAME", "RECORD_FIELDS", "SCHEMA_VERSION", "input_ref",
           "log_files", "map_count", "record_lines", "save_array", "should_audit"]
