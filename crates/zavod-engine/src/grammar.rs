//! Grammars for structured output: OpenAI's `response_format` asks for JSON
//! (any object, or one following a JSON schema); llama.cpp's grammar
//! sampler holds each token to a GBNF grammar.

use crate::EngineError;

/// Any JSON object. Whitespace between tokens is bounded, so a model that
/// likes blank lines cannot spend its whole budget on them.
pub const JSON_OBJECT: &str = r#"root    ::= object
value   ::= object | array | string | number | literal
object  ::= "{" ws (member ("," ws member)*)? "}" ws
member  ::= string ":" ws value
array   ::= "[" ws (value ("," ws value)*)? "]" ws
literal ::= ("true" | "false" | "null") ws
string  ::= "\"" char* "\"" ws
char    ::= [^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
number  ::= "-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})? ws
ws      ::= [ \t\n]{0,4}
"#;

/// The grammar of the JSON documents `schema` (a JSON Schema, as text)
/// allows, by llama.cpp's own converter.
pub fn json_schema(schema: &str) -> Result<String, EngineError> {
    llama_cpp_2::json_schema_to_grammar(schema).map_err(|e| {
        EngineError::Config(format!(
            "llama.cpp cannot turn this JSON schema into a grammar: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_becomes_a_grammar_and_nonsense_is_refused() {
        let g = json_schema(
            r#"{"type":"object","properties":{"capital":{"type":"string"}},"required":["capital"]}"#,
        )
        .expect("converts");
        assert!(g.contains("root"), "{g}");
        assert!(g.contains("capital"), "{g}");
        assert!(json_schema("not json").is_err());
    }
}
