"""The capture runtime: filters, staging, the writer thread, capture-time stats."""
