from qflare.cli import app

app()
