"""asbuilt agent: owns the profile and the loop that feeds it (CLI, scan builder, daemon)."""
__version__ = "0.1.0"
