"""Multi-tenant gateway for the Azure OpenAI Responses API."""

__version__ = "0.1.0"
