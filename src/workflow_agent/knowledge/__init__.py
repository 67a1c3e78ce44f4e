"""Documentation into knowledge: fetch (``fetch``), parse (``parse``), store and search
(``store``).

Nothing here is imported by a plain workflow run unless a knowledge base file exists:
the knowledge agent imports ``store`` lazily, and ``fetch`` imports httpx only when a URL
is fetched.
"""
