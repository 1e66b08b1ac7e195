"""Long work as jobs on Ray: the job table (:mod:`.store`), the hook stored products pass through
(:mod:`.context`), the kinds of work (:mod:`.kinds`) and the engine that runs them (:mod:`.engine`).

Importing this package does not import Ray; :mod:`.engine` does, when work is submitted or followed.
"""
