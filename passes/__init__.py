"""The toolkit's passes, one module each. Use them by name (``optimize(model, ["approx_bp"])``)
or as objects with options (``passes.ApproxBP(norms=False)``)."""

from passes.approx_bp import ApproxBP
from passes.remat import Remat

__all__ = ["ApproxBP", "Remat"]
