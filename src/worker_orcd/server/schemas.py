"""Request bodies (pydantic, strict: a string is not a number) and the documented response shapes."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]  # what torch.Generator.manual_seed takes
TopK = Annotated[int, Field(ge=0)]
# a stop string is text the caller expects verbatim ("\n\n", "User:"); what may still grow into one is held
# back from the stream, so a long one delays tokens; 16 x 512 characters cost ~6 us a token to match
StopString = Annotated[str, Field(max_length=512)]
StopList = Annotated[list[StopString], Field(max_length=16)]
TokenId = Annotated[int, Field(ge=0)]
TokenPrompt = Annotated[list[TokenId], Field(min_length=1)]
OneTextPrompt = Annotated[list[str], Field(min_length=1, max_length=1)]  # n=1: a batch of one prompt


class Strict(BaseModel):
    model_config = ConfigDict(strict=True)


# -- worker API -------------------------------------------------------------------------------------

class ExecuteRequest(Strict):
    job_id: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: Annotated[str, Field(min_length=1)]
    max_tokens: MaxTokens = 256
    temperature: Temperature = 0.0
    seed: Seed = 0
    top_p: TopP = 1.0
    top_k: TopK = 0
    stop: StopList | None = None


class CancelRequest(Strict):
    job_id: Annotated[str, Field(min_length=1, max_length=256)]


class Accepted(BaseModel):
    job_id: str | None = None
    status: str


class Health(BaseModel):
    status: str
    model: str
    vram_bytes: int
    uptime_seconds: float
    architecture: str
    quant: str
    device: str
    vram_resident: bool  # every tensor of the model is on `device` (checked once, after load)


# -- OpenAI-compatible API --------------------------------------------------------------------------
# Unknown fields are refused (400 unknown_parameter); OpenAI fields this worker does not implement are
# declared, so a no-op value (frequency_penalty 0, n 1, logprobs false) passes and any other is refused
# naming the field (400 unsupported_parameter): never accepted and silently ignored.

class OpenAIStrict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def _plain(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value


def refuse_unsupported(body: BaseModel, unsupported: dict[str, tuple]) -> None:
    """400 naming the first field set to a value this worker does not implement (null and the values listed
    for it, which change nothing, pass)."""
    from worker_orcd.server.errors import APIError

    for name, noops in unsupported.items():
        value = getattr(body, name, None)
        if value is None or any(value == n and type(value) is type(n) for n in noops):
            continue
        allowed = "".join(f", {json.dumps(_plain(n))}" for n in noops)
        raise APIError(400, "UNSUPPORTED_FIELD", f"{name}: {json.dumps(_plain(value))[:80]} is not supported by "
                                                 f"this worker (accepted: null{allowed})", name)


class StreamOptions(OpenAIStrict):
    include_usage: bool = False


class StructuredOutputs(OpenAIStrict):
    """vLLM's extension: exactly one constraint on the output text."""
    json_: dict[str, Any] | None = Field(None, alias="json")  # a JSON schema
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=256)] | None = None
    grammar: str | None = None  # EBNF, as xgrammar (and llama.cpp's GBNF, mostly) writes it

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        from worker_orcd.server.errors import APIError

        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise APIError(400, "INVALID_REQUEST", "structured_outputs: give exactly one of json, regex, choice, "
                                                   "grammar", "structured_outputs")
        return self


class SamplingFields(OpenAIStrict):
    model: str | None = None  # optional: this worker serves one model, under any of its names
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0  # an extension, as vLLM and llama.cpp have it
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = None
    user: str | None = None  # metadata: no effect on the output
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension (regex, choice, grammar, json)
    # declared, not implemented: only their no-op values pass (see UNSUPPORTED)
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"n": (1,), "frequency_penalty": (0.0, 0),
                                               "presence_penalty": (0.0, 0), "logit_bias": ({},)}

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> SamplingFields:
        from worker_orcd.server.errors import APIError

        refuse_unsupported(self, self.UNSUPPORTED)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "INVALID_REQUEST", "stream_options: only allowed with stream: true", "stream_options")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | TokenPrompt | OneTextPrompt
    max_tokens: MaxTokens | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {**SamplingFields.UNSUPPORTED, "logprobs": (), "echo": (False,),
                                               "best_of": (1,), "suffix": ("",)}


class TextPart(OpenAIStrict):
    type: Literal["text"]
    text: str


# OpenAI's limit on function names; it also keeps names from breaking out of a template's markup
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class ToolCallFunction(OpenAIStrict):
    name: FunctionName
    arguments: str  # JSON text, as the API sends it


class ToolCall(OpenAIStrict):
    id: Annotated[str, Field(max_length=256)]
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(OpenAIStrict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # assistant: what this API returned as reasoning (GPT-OSS)
    # what the openai client echoes back from a response; only null is accepted
    refusal: None = None
    function_call: None = None
    audio: None = None


class FunctionDef(OpenAIStrict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None  # true asks for grammar-constrained arguments: refused, not implemented


class Tool(OpenAIStrict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(OpenAIStrict):
    name: FunctionName


class NamedToolChoice(OpenAIStrict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(OpenAIStrict):
    name: Annotated[str, Field(max_length=64)] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema here (a grammar constrains it)


class ResponseFormat(OpenAIStrict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None  # GPT-OSS harmony
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call is returned
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    # OpenAI metadata with no effect on the output
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # OpenAI features this worker does not have
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        **SamplingFields.UNSUPPORTED, "logprobs": (False,), "top_logprobs": (0,), "store": (False,),
        "service_tier": ("auto", "default"), "modalities": (["text"],), "audio": (), "prediction": (),
        "functions": (), "function_call": (), "web_search_options": (), "verbosity": ()}

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatRequest:
        from worker_orcd.server.errors import APIError

        fmt = self.response_format
        if fmt is not None and fmt.type != "text" and self.structured_outputs is not None:
            raise APIError(400, "INVALID_REQUEST", "structured_outputs: give it or response_format, not both",
                           "structured_outputs")
        constrained = (fmt is not None and fmt.type != "text") or self.structured_outputs is not None
        if constrained and self.tools and self.tool_choice != "none":
            field = "response_format" if self.structured_outputs is None else "structured_outputs"
            raise APIError(400, "UNSUPPORTED_FIELD", f"{field}: constrained output together with tools is not "
                                                     f"supported by this worker", field)
        if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None
                                                              or fmt.json_schema.schema_ is None):
            raise APIError(400, "INVALID_REQUEST", "response_format.json_schema.schema: a JSON schema is required "
                                                   "for type json_schema", "response_format.json_schema.schema")

        for i, tool in enumerate(self.tools or []):
            if tool.function.strict:
                raise APIError(400, "UNSUPPORTED_FIELD", f"tools[{i}].function.strict: strict (grammar-constrained) "
                                                         f"arguments are not supported by this worker",
                               f"tools[{i}].function.strict")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            names = {t.function.name for t in self.tools or []}
            want = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
            if not names or (want is not None and want not in names):
                what = f"function {want!r} is not among tools" if names else "no tools were given"
                raise APIError(400, "INVALID_REQUEST", f"tool_choice: {what}", "tool_choice")
        return self


class TokenizeRequest(OpenAIStrict):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(OpenAIStrict):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
