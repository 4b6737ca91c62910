"""The affinity key of a conversation: the same from one turn to the next, and only that."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from ollana.affinity import KEY_LIMIT, PROMPT_START, conversation_key, wants_key

MODEL = "llama3.2"
SYSTEM = {"role": "system", "content": "You answer in one sentence."}
Q1 = {"role": "user", "content": "What is Twisted?"}
A1 = {"role": "assistant", "content": "An event-driven networking engine for Python."}
Q2 = {"role": "user", "content": "And trial?"}
A2 = {"role": "assistant", "content": "Its test runner."}
Q3 = {"role": "user", "content": "Thanks."}


def body(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, **fields}).encode("utf-8")


def chat(*messages: object, path: bytes = b"/api/chat", model: str = MODEL) -> str | None:
    """The key of a chat request with these messages."""
    return conversation_key(path, model, body(messages=list(messages)))


def generate(
    prompt: object = None, system: object = None, path: bytes = b"/api/generate"
) -> str | None:
    fields = {name: value for name, value in (("prompt", prompt), ("system", system)) if value}
    return conversation_key(path, MODEL, body(**fields))


class ChatKeyTests(SynchronousTestCase):
    def test_stable_from_turn_to_turn(self) -> None:
        first = chat(SYSTEM, Q1)
        assert first is not None
        self.assertRegex(first, "^[0-9a-f]{32}$")
        self.assertEqual(chat(SYSTEM, Q1, A1, Q2), first)
        self.assertEqual(chat(SYSTEM, Q1, A1, Q2, A2, Q3), first)

    def test_without_a_system_message(self) -> None:
        first = chat(Q1)
        self.assertIsNotNone(first)
        self.assertEqual(chat(Q1, A1, Q2), first)
        self.assertNotEqual(chat(SYSTEM, Q1), first)

    def test_another_conversation_or_model_has_another_key(self) -> None:
        first = chat(SYSTEM, Q1, A1, Q2)
        self.assertNotEqual(chat(SYSTEM, Q2, A1, Q1), first, "another first question")
        other_system = {"role": "system", "content": "You answer in French."}
        self.assertNotEqual(chat(other_system, Q1, A1, Q2), first, "another system prompt")
        self.assertNotEqual(chat(SYSTEM, Q1, A1, Q2, model="qwen3:8b"), first, "another model")
        keys = {chat(SYSTEM, {"role": "user", "content": f"question {n}"}) for n in range(100)}
        self.assertEqual(len(keys), 100)

    def test_the_system_and_user_texts_do_not_run_together(self) -> None:
        one = chat({"role": "system", "content": "ab"}, {"role": "user", "content": "c"})
        two = chat({"role": "system", "content": "a"}, {"role": "user", "content": "bc"})
        self.assertNotEqual(one, two)

    def test_the_first_system_message_counts(self) -> None:
        first = chat(SYSTEM, Q1)
        later = {"role": "system", "content": "Now answer at length."}
        self.assertEqual(chat(SYSTEM, Q1, A1, later, Q2), first)

    def test_messages_that_are_not_objects_are_skipped(self) -> None:
        self.assertEqual(chat("junk", 5, None, SYSTEM, [Q1], Q1), chat(SYSTEM, Q1))

    def test_a_query_does_not_matter(self) -> None:
        self.assertEqual(chat(SYSTEM, Q1, path=b"/api/chat?stream=false"), chat(SYSTEM, Q1))

    def test_openai_chat_completions_with_list_content(self) -> None:
        path = b"/v1/chat/completions"
        question = {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "Twisted?"},
                "junk",
                {"type": "text", "text": 5},
            ],
        }
        first = chat(SYSTEM, question, path=path)
        self.assertIsNotNone(first)
        self.assertEqual(first, chat(SYSTEM, Q1, path=path), "the text parts, joined")
        self.assertEqual(chat(SYSTEM, question, A1, Q2, path=path), first)
        other = {"role": "user", "content": [{"type": "text", "text": "What is trial?"}]}
        self.assertNotEqual(chat(SYSTEM, other, path=path), first)
        self.assertEqual(chat(SYSTEM, Q1, path=b"/v1/chat/completions?x=1"), first)


class PromptKeyTests(SynchronousTestCase):
    def test_system_and_the_prompts_start(self) -> None:
        start = "Summarise this document:\n" + "x" * PROMPT_START
        first = generate(start + " the first ending", "Be brief.")
        self.assertIsNotNone(first)
        self.assertEqual(generate(start + " another ending", "Be brief."), first)
        self.assertNotEqual(generate("y" + start[1:] + " the first ending", "Be brief."), first)
        self.assertNotEqual(generate(start + " the first ending", "Be long."), first)
        self.assertNotEqual(generate(start + " the first ending"), first)

    def test_a_prompt_alone_or_a_system_alone(self) -> None:
        self.assertIsNotNone(generate("Why is the sky blue?"))
        self.assertNotEqual(generate("Why is the sky blue?"), generate("Why is grass green?"))
        self.assertIsNotNone(generate(system="Be brief."))

    def test_openai_completions_like_generate(self) -> None:
        self.assertEqual(
            generate("Why is the sky blue?", path=b"/v1/completions"),
            generate("Why is the sky blue?"),
        )


class NoKeyTests(SynchronousTestCase):
    def test_a_body_over_the_limit(self) -> None:
        def sized(size: int) -> bytes:
            message = {"role": "user", "content": ""}
            message["content"] = "q" * (size - len(body(messages=[message])))
            made = body(messages=[message])
            assert len(made) == size
            return made

        self.assertIsNotNone(conversation_key(b"/api/chat", MODEL, sized(KEY_LIMIT)))
        self.assertIsNone(conversation_key(b"/api/chat", MODEL, sized(KEY_LIMIT + 1)))
        self.assertIsNone(conversation_key(b"/api/generate", MODEL, sized(KEY_LIMIT + 1)))

    def test_not_json(self) -> None:
        for junk in [b"", b"{", b'{"model": "x", "messages": [', b"\xff\xfe", b"model=x",
                     b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"]:  # fmt: skip
            self.assertIsNone(conversation_key(b"/api/chat", MODEL, junk), junk[:40])
            self.assertIsNone(conversation_key(b"/api/generate", MODEL, junk), junk[:40])

    def test_not_an_object(self) -> None:
        for value in [b"[]", b'[{"role": "user", "content": "hi"}]', b'"hi"', b"42", b"null"]:
            self.assertIsNone(conversation_key(b"/api/chat", MODEL, value), value)
            self.assertIsNone(conversation_key(b"/api/generate", MODEL, value), value)

    def test_no_conversation_in_it(self) -> None:
        chats: list[dict[str, object]] = [
            {},
            {"messages": []},
            {"messages": "What is Twisted?"},
            {"messages": {"role": "user", "content": "What is Twisted?"}},
            {"messages": [A1]},
            {"messages": [{"role": "user", "content": ""}]},
            {"messages": [{"role": "user", "content": 42}]},
            {"messages": [{"role": "user"}]},
            {"prompt": "What is Twisted?"},  # a prompt is no chat
        ]
        for fields in chats:
            self.assertIsNone(conversation_key(b"/api/chat", MODEL, body(**fields)), fields)
        prompts: list[dict[str, object]] = [{}, {"prompt": ""}, {"prompt": 42},
                                            {"messages": [SYSTEM, Q1]}]  # fmt: skip
        for fields in prompts:
            self.assertIsNone(conversation_key(b"/api/generate", MODEL, body(**fields)), fields)


class WantsKeyTests(SynchronousTestCase):
    def test_turns_of_a_conversation(self) -> None:
        for path in [
            b"/api/chat",
            b"/api/chat?stream=false",
            b"/api/generate",
            b"/api/generate?a=1&b=2",
            b"/v1/chat/completions",
            b"/v1/chat/completions?x",
            b"/v1/completions",
        ]:
            self.assertTrue(wants_key(path), path)

    def test_other_requests(self) -> None:
        for path in [
            b"/",
            b"/api/embed",
            b"/api/embeddings",
            b"/api/show",
            b"/api/pull",
            b"/api/chat/",
            b"/api/chatter",
            b"/api/chat/completions",
            b"/API/CHAT",
            b"/v1/embeddings",
            b"/v1/chat",
            b"?/api/chat",
            b"/x?/api/chat",
        ]:
            self.assertFalse(wants_key(path), path)
