"""An OpenAI-compatible chat client that returns JSON validated against a JSON schema."""

from .client import (
    API_KEY_ENV_VAR,
    BASE_URL_ENV_VAR,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT,
    MODEL_ENV_VAR,
    JsonChatClient,
    LLMResponseError,
    LLMTimeoutError,
    check_timeout_and_retries,
    default_cache_dir,
    is_format_unsupported,
    is_retryable,
    parse_json_object,
)
from .schema import SchemaValidationError, schema_errors, validate_json

__all__ = [
    "API_KEY_ENV_VAR",
    "BASE_URL_ENV_VAR",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT",
    "MODEL_ENV_VAR",
    "JsonChatClient",
    "LLMResponseError",
    "LLMTimeoutError",
    "SchemaValidationError",
    "check_timeout_and_retries",
    "default_cache_dir",
    "is_format_unsupported",
    "is_retryable",
    "parse_json_object",
    "schema_errors",
    "validate_json",
]
