//! What a queued build waits for. Jenkins does not export an item's label; its `why` text
//! (English, thanks to `Accept-Language: en`) names the label — or the one node carrying it.

/// The label or node name a `why` text says the item waits for.
pub(crate) fn waiting_for(why: &str) -> Option<&str> {
    const PATTERNS: &[(&str, &str)] = &[
        ("There are no nodes with the label \u{2018}", "\u{2019}"),
        ("All nodes of label \u{2018}", "\u{2019} are offline"),
        (
            "Waiting for next available executor on \u{2018}",
            "\u{2019}",
        ),
        // Exactly one node carries the label: Jenkins names the node.
        ("\u{2018}", "\u{2019} is offline"),
        ("\u{2018}", "\u{2019} doesn\u{2019}t have label"),
    ];
    let why = why.trim();
    for (prefix, suffix) in PATTERNS {
        if let Some(rest) = why.strip_prefix(prefix)
            && let Some(end) = rest.find(suffix)
        {
            let name = &rest[..end];
            if !name.is_empty() {
                return Some(name);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::waiting_for;

    proptest::proptest! {
        /// Any `why` text, quotes and all: a label that is a piece of it, or none; no panic.
        #[test]
        fn any_why_text_gives_a_piece_of_itself_or_nothing(
            why in "(There are no nodes with the label |All nodes of label |Waiting for next available executor on )?[\u{2018}\u{2019}a-z\u{e9} ]{0,40}( is offline| doesn\u{2019}t have label| are offline)?",
        ) {
            if let Some(label) = waiting_for(&why) {
                proptest::prop_assert!(!label.is_empty() && why.contains(label));
            }
        }
    }

    #[test]
    fn reads_the_label_from_each_why_text() {
        assert_eq!(
            waiting_for("There are no nodes with the label \u{2018}maven\u{2019}"),
            Some("maven")
        );
        assert_eq!(
            waiting_for("All nodes of label \u{2018}maven\u{2019} are offline"),
            Some("maven")
        );
        assert_eq!(
            waiting_for("Waiting for next available executor on \u{2018}maven\u{2019}"),
            Some("maven")
        );
        assert_eq!(
            waiting_for("\u{2018}kiln-maven-1a2b\u{2019} is offline"),
            Some("kiln-maven-1a2b")
        );
    }

    #[test]
    fn other_reasons_are_not_waits_for_a_label() {
        assert_eq!(waiting_for("In the quiet period. Expires in 4.9 sec"), None);
        assert_eq!(
            waiting_for("Build #3 is already in progress (ETA: 1 min)"),
            None
        );
        assert_eq!(
            waiting_for("Es gibt keine Knoten mit dem Label \u{201e}maven\u{201c}"),
            None
        );
        assert_eq!(waiting_for(""), None);
    }
}
