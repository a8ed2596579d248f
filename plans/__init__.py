"""Shipped cache plans for the reference models (YAML + optional safetensors sidecars)."""
