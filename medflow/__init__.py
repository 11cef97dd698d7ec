"""medflow: MRI-to-PET synthesis with a 3D conditional normalizing flow (Dual-Glow)."""

__version__ = "0.1.0"
__all__ = ["DualGlow", "__version__"]


def __getattr__(name):
    if name == "DualGlow":
        from medflow.model import DualGlow

        return DualGlow
    raise AttributeError(f"module 'medflow' has no attribute {name!r}")
