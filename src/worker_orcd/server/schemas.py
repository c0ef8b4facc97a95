"""Request bodies (pydantic, strict: a string is not a number) and the documented response shapes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

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

class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0  # an extension, as vLLM and llama.cpp have it
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | TokenPrompt | OneTextPrompt
    max_tokens: MaxTokens | None = 16  # OpenAI's default for completions
    logprobs: None = None  # not supported: only null is accepted
    echo: Literal[False] = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: Literal[False] | None = None  # not supported
    reasoning_effort: Literal["low", "medium", "high"] | None = None  # GPT-OSS harmony


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None


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
