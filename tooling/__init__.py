"""Test doubles for Corral: stand-ins that speak the same wire protocols as real services."""
