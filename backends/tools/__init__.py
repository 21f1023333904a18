"""Tool calling on the local engines, as OpenAI's Chat Completions define it.

The model's own chat template renders the tools and the call history (`prompt`); a
template without tool support gets turnout's fallback prompt, in the Hermes format. The
answer's text is parsed back into calls per template family (`parser`), streamed or not;
`tool_choice` "required" or a named function is enforced by a grammar in that family's
format (`grammar`). `formats` names the families.
"""
