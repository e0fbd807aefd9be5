"""Deployment helpers for exported models (OpenVINO inference with overlays)."""
