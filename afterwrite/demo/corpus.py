"""A small knowledge base for the demo and tests: help-centre articles of an AI platform.

Each article has a topic, so a search can be judged: a query about GPU quotas should find the
GPU-quota articles. ``documents(n)`` makes ``n`` documents by pairing articles with the teams
that wrote their variants; texts differ, topics repeat.
"""

from __future__ import annotations

from collections.abc import Iterator

ARTICLES: dict[str, tuple[str, ...]] = {
    "billing": (
        "Invoices are issued on the first day of each month and list token usage per model.",
        "You can change the credit card used for billing from the organisation settings page.",
        "Refunds for unused prepaid credits are processed within ten business days.",
    ),
    "password": (
        "To reset your password, click 'Forgot password' on the sign-in page and follow the "
        "link we email you.",
        "Password reset links expire after thirty minutes; request a new one if it stopped "
        "working.",
        "Accounts are locked for fifteen minutes after five failed sign-in attempts.",
    ),
    "gpu": (
        "Each project has a GPU quota; ask an administrator to raise it for larger "
        "fine-tuning jobs.",
        "Fine-tuning jobs wait in a queue when the project's GPU quota is used up.",
        "A100 and H100 GPUs are available in the EU region; T4 GPUs in every region.",
    ),
    "rag": (
        "Retrieval-augmented generation looks up relevant passages in a vector index and adds "
        "them to the prompt.",
        "Chunk documents into passages of a few hundred tokens before embedding them for "
        "retrieval.",
        "Answers cite the retrieved passages so that readers can check each claim.",
    ),
    "latency": (
        "Streaming responses show the first tokens after a few hundred milliseconds.",
        "Prompt caching cuts latency and cost when many requests share a long system prompt.",
        "Requests time out after sixty seconds; long generations should use streaming.",
    ),
    "privacy": (
        "Customer prompts are never used to train models and are deleted after thirty days.",
        "Data is encrypted at rest with AES-256 and in transit with TLS 1.3.",
        "Administrators can export or delete all of an organisation's data on request.",
    ),
    "rate_limits": (
        "Rate limits are counted in requests and tokens per minute for each API key.",
        "A 429 response means the rate limit was reached; retry after the Retry-After delay.",
        "Higher rate limits are granted automatically as monthly usage grows.",
    ),
    "agents": (
        "Agents call tools in steps; each step's input, output and duration is logged.",
        "An agent stops after twenty tool calls unless the limit is raised for the task.",
        "Tool definitions are JSON schemas that describe each function's parameters.",
    ),
}

TEAMS = (
    "support",
    "platform",
    "billing",
    "security",
    "research",
    "solutions",
    "docs",
    "sales engineering",
)

QUERIES = (
    "how do I get a new password",
    "my fine-tuning job is stuck waiting for GPUs",
    "why am I getting 429 errors",
    "is my data used for training",
)


def documents(n: int) -> Iterator[tuple[str, str, str]]:
    """``n`` (doc_id, topic, text) triples."""
    flat = [(topic, text) for topic, texts in ARTICLES.items() for text in texts]
    for i in range(n):
        topic, text = flat[i % len(flat)]
        variant = i // len(flat)
        team = TEAMS[variant % len(TEAMS)]
        if variant:
            text = f"{text} (Note {variant} from the {team} team.)"
        yield f"kb-{i:05d}", topic, text
