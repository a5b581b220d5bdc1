//! Class names as model files and label files write them.

use std::collections::BTreeMap;

/// Reads class names written in any of the usual ways: a JSON list, a JSON or Python dict of
/// index → name, one name per line, or comma-separated.
pub fn parse_class_names(text: &str) -> Vec<String> {
    let text = text.trim();
    if let Ok(list) = serde_json::from_str::<Vec<String>>(text) {
        return list;
    }
    if let Ok(map) = serde_json::from_str::<BTreeMap<String, String>>(text) {
        let mut entries: Vec<(usize, String)> = map
            .into_iter()
            .filter_map(|(k, v)| Some((k.trim().parse().ok()?, v)))
            .collect();
        entries.sort();
        return entries.into_iter().map(|(_, v)| v).collect();
    }
    if text.starts_with('{') {
        // A Python dict: {0: 'person', 1: "it's"}.
        let mut names = Vec::new();
        let mut rest = text.trim_start_matches('{');
        while let Some(colon) = rest.find(':') {
            let after = rest[colon + 1..].trim_start();
            let Some(quote) = after.chars().next().filter(|c| *c == '\'' || *c == '"') else {
                break;
            };
            let body = &after[1..];
            let Some(end) = body.find(quote) else {
                break;
            };
            names.push(body[..end].to_string());
            rest = &body[end + 1..];
        }
        return names;
    }
    let separator = if text.contains('\n') { '\n' } else { ',' };
    text.split(separator)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The class a folder name stands for among `names`, ignoring case, spaces, `_`, `-` and
/// other punctuation, and a plural "s" or "es": "Egyptian_cat", "espresso", "golden
/// retrievers". The first class wins where two share a name.
pub fn class_for_name(names: &[String], name: &str) -> Option<usize> {
    let key = name_key(name);
    if key.is_empty() {
        return None;
    }
    let find = |k: &str| names.iter().position(|n| name_key(n) == k);
    find(&key)
        .or_else(|| key.strip_suffix("es").and_then(find))
        .or_else(|| key.strip_suffix('s').and_then(find))
}

/// The class a folder stands for in a model with `classes` outputs: one of `names` (as
/// [`class_for_name`] matches them) when the model has names, else a class number
/// ("3", "class 3").
pub fn class_for_folder(names: &[String], classes: usize, folder: &str) -> Option<usize> {
    let class = if names.is_empty() {
        let key = name_key(folder);
        key.strip_prefix("class")
            .unwrap_or(&key)
            .parse::<usize>()
            .ok()
    } else {
        class_for_name(names, folder)
    };
    class.filter(|&c| c < classes)
}

/// The user's own classes that `folders` name: one per distinct name as [`name_key`] compares
/// them ("Cats" and "cats" are one class), in that key's order, each spelt as its first
/// folder; a name with no letter or digit names none. [`class_for_name`] finds each
/// folder's class among them.
pub fn folder_classes<'a>(folders: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut by_key: BTreeMap<String, String> = BTreeMap::new();
    for folder in folders {
        let key = name_key(folder);
        if !key.is_empty() {
            by_key.entry(key).or_insert_with(|| folder.to_string());
        }
    }
    by_key.into_values().collect()
}

/// Lower-case letters and digits of `name` (what folder-name matching compares).
pub fn name_key(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}
