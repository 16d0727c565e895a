"""relay: an SMTP smarthost that instruments mail the way Amazon SES open and click tracking does."""

__version__ = "0.1.0"
