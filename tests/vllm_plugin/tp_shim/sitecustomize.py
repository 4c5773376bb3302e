"""TEMPORARY: installs fopru_parts_shim in every process of a tensor-parallel test run (PYTHONPATH)."""
import fopru_parts_shim

fopru_parts_shim.install()
