"""An OpenAI-compatible chat client that returns JSON validated against a JSON schema."""

from .client import (
    API_KEY_ENV_VAR,
    BASE_URL_ENV_VAR,
    DEFAULT_MODEL,
    MODEL_ENV_VAR,
    JsonChatClient,
    LLMResponseError,
    default_cache_dir,
    is_retryable,
    parse_json_object,
)
from .schema import SchemaValidationError, schema_errors, validate_json

__all__ = [
    "API_KEY_ENV_VAR",
    "BASE_URL_ENV_VAR",
    "DEFAULT_MODEL",
    "MODEL_ENV_VAR",
    "JsonChatClient",
    "LLMResponseError",
    "SchemaValidationError",
    "default_cache_dir",
    "is_retryable",
    "parse_json_object",
    "schema_errors",
    "validate_json",
]
