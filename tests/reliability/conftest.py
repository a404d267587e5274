"""The reliability suite uses the shared fixtures (tests/conftest.py); its machinery is in
tests/reliability/helpers.py."""
