"""The cffi backend (C kernels on the CPU). Filled in by the C-backend work."""
