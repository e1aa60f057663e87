from detserve.cli import app

app()
