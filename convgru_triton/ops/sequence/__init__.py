"""The sequence operator (:mod:`.op`), its vmap rules (:mod:`.vmap`) and the
reference of a step and a layer (:mod:`.naive`)."""
