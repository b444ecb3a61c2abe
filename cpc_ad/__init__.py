"""CPC and CPC-AD for image anomaly detection, one concern per module (docs/module.md).

Import the façade, `import cpc_utils as cu`, for every public name at once; this package
imports nothing on its own, so `python -m cpc_utils --help` answers before torch loads.
"""
