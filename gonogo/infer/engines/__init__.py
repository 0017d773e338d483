"""Serving engines: gonogo's own server, vLLM from its own venv, or any OpenAI-compatible command.

``start.py`` turns an engine choice into a server child (``ServerProcess`` in ``process.py``,
the one owner of starting, health-checking and stopping servers); ``install.py`` sets vLLM up.
"""
