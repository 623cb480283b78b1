"""A tiny Django app run by Django's own test runner against a simulated cluster through
resilient_db's Django backends (tests/test_django.py starts the cluster and the runner)."""
