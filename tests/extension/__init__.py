"""Tests of extension/ (the web-UI side)."""
