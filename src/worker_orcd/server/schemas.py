"""Request bodies (pydantic, strict: a string is not a number) and the documented response shapes."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
OneTextPrompt = Annotated[list[str], Field(min_length=1, max_length=1)]  # a batch of one prompt
MAX_N = 128  # choices per request (the worker's --max-batch bounds it further)
MAX_LOGPROBS = 20  # most likely tokens reported per position (vLLM's default max_logprobs)
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class SamplingExtras(Strict):
    """Sampling fields both APIs take: OpenAI's penalties and logit_bias, vLLM's extensions (null: off)."""
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    # token id (a decimal string, as OpenAI's API has it) -> added to its logit; clamped to [-100, 100] as vLLM does
    logit_bias: Annotated[dict[str, Annotated[float, Field(allow_inf_nan=False)]], Field(max_length=1024)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    ignore_eos: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _ids_as_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys are token ids, got {key[:40]!r}")
        return bias

    def bias(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (id, bias) pairs, each bias clamped to [-100, 100]."""
        return tuple((int(k), min(max(v, -100.0), 100.0)) for k, v in (self.logit_bias or {}).items())


# -- worker API -------------------------------------------------------------------------------------

class ExecuteRequest(SamplingExtras):
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
# declared, so a no-op value (best_of 1, store false, modalities ["text"]) passes and any other is refused
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


class SamplingFields(OpenAIStrict, SamplingExtras):
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
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None  # choices, decoded together; choice i seeded seed + i

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> SamplingFields:
        from worker_orcd.server.errors import APIError

        refuse_unsupported(self, self.UNSUPPORTED)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "INVALID_REQUEST", "stream_options: only allowed with stream: true", "stream_options")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | TokenPrompt | OneTextPrompt
    # OpenAI's default for completions; 0 only with echo (the prompt's logprobs alone: lm-evaluation-harness)
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # the k most likely at each position
    echo: bool | None = None  # true: the prompt is returned before the text (and its logprobs, with logprobs)
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {**SamplingFields.UNSUPPORTED, "best_of": (1,), "suffix": ("",)}

    @model_validator(mode="after")
    def _echo_only_for_zero(self) -> CompletionRequest:
        from worker_orcd.server.errors import APIError

        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "INVALID_REQUEST", "max_tokens: 0 is only allowed with echo: true", "max_tokens")
        return self


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
    logprobs: bool | None = None  # true: each generated token's logprob (choices[i].logprobs.content)
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # needs logprobs: true
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
        **SamplingFields.UNSUPPORTED, "store": (False,),
        "service_tier": ("auto", "default"), "modalities": (["text"],), "audio": (), "prediction": (),
        "functions": (), "function_call": (), "web_search_options": (), "verbosity": ()}

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatRequest:
        from worker_orcd.server.errors import APIError

        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "INVALID_REQUEST", "top_logprobs: needs logprobs: true", "top_logprobs")
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


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the prompt's first token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


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
