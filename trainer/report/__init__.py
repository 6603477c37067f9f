"""`python -m trainer report`: a run's page and picture."""
