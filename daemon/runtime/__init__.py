"""Built-in model server run by the daemon as a script (see serve.py)."""
