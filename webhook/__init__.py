"""Receive Mirror's notifications over HTTP and start one workflow for each."""

from webhook.app import create_app, run, serve

__all__ = ["create_app", "run", "serve"]
