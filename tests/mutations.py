"""Does the suite bite? Each mutation below is a deliberate bug that breaks a promise README makes; this
script applies each one to a scratch copy of the repository, runs the tests that should catch it, and
prints a caught/escaped table. Not collected by pytest (no test_ prefix): run it by hand.

    python tests/mutations.py                 # every mutation (about 10-15 minutes on 2 cores)
    python tests/mutations.py -k micro_step   # the mutations whose name contains "micro_step"
    python tests/mutations.py --list

A mutation is (name, file, the exact text it replaces, the replacement, the tests to run). The text must
occur exactly once: a refactor that moves it makes the script say "does not apply" (and exit non-zero),
so the list is kept up to date with the code. A change that adds a promise adds its mutation here.
The last line reads `N caught, M escaped` (+ `, K do not apply`).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: list  # pytest node ids or files, with optional "-k expr" as a separate item


MUTATIONS = [
    Mutation(
        "sft_batch_ignores_answer_mask",
        "dataset_sft.py",
        "pairs.append(labels_for(ids.tolist(), mask.tolist()))",
        "pairs.append(labels_for(ids.tolist(), [True] * len(mask)))",
        ["tests/test_sft.py"],
    ),
    Mutation(
        "sft_labels_one_position_off",
        "dataset_sft.py",
        "y = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], is_answer[1:])]",
        "y = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], is_answer[:-1])]",
        ["tests/test_sft.py"],
    ),
    Mutation(
        "ddp_all_reduce_on_every_micro_step",
        "parallel.py",
        "if self.dist.enabled and not last_micro_step:",
        "if False:",
        ["tests/test_trainer.py", "-k", "last_micro_step"],
    ),
    Mutation(
        "loss_normalised_by_local_count",
        "trainer.py",
        "scale = self.dist.world / max(tokens, 1)",
        "scale = self.dist.world / max(local_tokens * self.dist.world, 1)",
        ["tests/test_trainer.py", "-k", "global_count"],
    ),
    Mutation(
        "sequential_cursors_not_restored",
        "dataset.py",
        'self.cursors = np.array(state["cursors"], dtype=np.int64)',
        "pass",
        ["tests/test_trainer.py", "-k", "sequential", "tests/test_pretrain.py", "-k", "sequential"],
    ),
    Mutation(
        "bf16_head_gradient_keeps_last_chunk",
        "lm_head.py",
        "                if start == 0:\n                    grad_weight.copy_(product)",
        "                if True:\n                    grad_weight.copy_(product)",
        ["tests/test_model.py", "-k", "bf16"],
    ),
    Mutation(
        "atomic_save_writes_in_place",
        "checkpoint.py",
        "atomic_write(path, lambda tmp: torch.save(obj, tmp))",
        "torch.save(obj, path)",
        ["tests/test_checkpoint.py"],
    ),
    Mutation(
        "fsdp_shards_replaced_in_place",
        "parallel.py",
        'shards = path.with_name(f"{path.name}.dcp-{step:09d}")',
        'shards = path.with_name(f"{path.name}.dcp-000000000")',
        ["tests/test_trainer.py", "-k", "fsdp", "tests/test_pretrain.py", "-k", "fsdp"],
    ),
    Mutation(
        "checkpoint_loaded_as_pickle",
        "checkpoint.py",
        "weights_only=True, mmap=mmap)",
        "weights_only=False, mmap=mmap)",
        ["tests/test_checkpoint.py", "-k", "crafted"],
    ),
    Mutation(
        "rng_not_restored_on_resume",
        "parallel.py",
        '        set_rng_state(ckpt["rng"] if isinstance(ckpt["rng"], dict) else ckpt["rng"][self.dist.rank])',
        "        pass",
        ["tests/test_pretrain.py", "-k", "resume"],
    ),
    Mutation(
        "a_new_run_takes_an_earlier_runs_checkpoints",
        "checkpoint.py",
        '        if meta.get("run_id") == run_id:',
        "        if True:",
        ["tests/test_checkpoint.py", "tests/test_pretrain.py", "-k", "earlier_run"],
    ),
    Mutation(
        "unknown_phase_keys_ignored",
        "pretrain.py",
        "        unknown = sorted(set(p) - set(PHASE_KEYS))",
        "        unknown = []",
        ["tests/test_pretrain.py", "-k", "config_mistakes"],
    ),
    Mutation(
        "token_ids_not_checked_against_vocab",
        "dataset.py",
        "        if vocab_size is not None and max_ids and max(max_ids) >= vocab_size:",
        "        if False:",
        ["tests/test_pretrain.py", "-k", "vocabulary"],
    ),
    Mutation(
        "manifest_path_escapes_its_folder",
        "dataset.py",
        '        if Path(name).name != name or name in (".", "..") or not name:',
        "        if not name:",
        ["tests/test_pretrain.py", "-k", "manifest_paths"],
    ),
    Mutation(
        "auto_precision_always_bf16",
        "precision.py",
        'return Precision("bfloat16" if factor >= BF16_MARGIN else "float32", f"auto: {verdict}")',
        'return Precision("bfloat16", f"auto: {verdict}")',
        ["tests/test_precision.py"],
    ),
    Mutation(
        "probe_draws_from_the_training_rng",
        "precision.py",
        "    generator = torch.Generator(device).manual_seed(0)\n    return torch.randn(*shape, generator=generator, "
        "device=device).to(dtype)",
        "    return torch.randn(*shape, device=device).to(dtype)",
        ["tests/test_precision.py", "-k", "random_state"],
    ),
    Mutation(
        "kv_cache_writes_at_the_wrong_position",
        "model.py",
        "cache[0][:, :, pos : pos + T] = k",
        "cache[0][:, :, max(pos - 1, 0):max(pos - 1, 0) + T] = k",
        ["tests/test_model.py", "tests/test_chat.py", "-k", "cache"],
    ),
    Mutation(
        "wsd_decay_starts_late",
        "trainer.py",
        "    x = min(step - decay_start, length)",
        "    x = min(max(0, step - decay_start - 1), length)",
        ["tests/test_pretrain.py", "-k", "wsd"],
    ),
    Mutation(
        "mcq_option_first_token_skipped",
        "eval.py",
        "rows = [((c + a)[:-1], [IGNORE_INDEX] * (len(c) - 1) + list(a)) for c, a in requests]",
        "rows = [((c + a)[:-1], [IGNORE_INDEX] * len(c) + list(a)[1:]) for c, a in requests]",
        ["tests/test_eval.py"],
    ),
    Mutation(
        "atomic_write_writes_in_place",
        "atomic.py",
        "        write(tmp)\n",
        "        write(path)\n        return\n",
        ["tests/test_checkpoint.py"],
    ),
    Mutation(
        "resumed_log_keeps_the_redone_steps",
        "runlog.py",
        "        if self.is_master and self.path.exists():",
        "        if False:",
        ["tests/test_trainer.py", "-k", "resume"],
    ),
    Mutation(
        "resumed_run_switches_precision",
        "trainer.py",
        '        if cfg["dtype"] == "auto" and trained_dtype:',
        "        if False:",
        ["tests/test_precision.py", "tests/test_trainer.py", "-k", "resume"],
    ),
    Mutation(
        "chunked_loss_counts_ignored_targets",
        "lm_head.py",
        "total += xent_grad_(g, t.clamp_min(0), t != IGNORE_INDEX, scratch)",
        "total += xent_grad_(g, t.clamp_min(0), t == t, scratch)",
        ["tests/test_model.py", "-k", "reference"],
    ),
    Mutation(
        "turns_shifted_onto_the_next_answer",
        "dataset_sft.py",
        "return [[(prompt_ids[p], None if a is None else answer_ids[a]) for p, a in slots] for slots in layout]",
        "return [[(prompt_ids[p], None if a is None else answer_ids[max(a - 1, 0)]) for p, a in slots]\n"
        "            for slots in layout]",
        ["tests/test_chat.py", "-k", "history", "tests/test_sft.py"],
    ),
    Mutation(
        "exact_duplicates_kept",
        "data_process.py",
        "new = dedup.exact.add(result.hashes)",
        "new = dedup.exact.add(result.hashes) | True",
        ["tests/test_data_process.py", "-k", "duplicate"],
    ),
    Mutation(
        "csv_cut_ignores_quotes",
        "corpora.py",
        "        while quotes % 2 and position < size:",
        "        while False:",
        ["tests/test_corpora.py", "-k", "split_pieces"],
    ),
    Mutation(
        "unit_line_numbers_miss_the_last_byte_of_each_read",
        "corpora.py",
        "found + int(np.count_nonzero(values[:got] == byte[0]))",
        "found + int(np.count_nonzero(values[: got - 1] == byte[0]))",
        ["tests/test_corpora.py", "-k", "split_pieces"],
    ),
    Mutation(
        "quickstart_stage_outlives_a_killed_run",
        "quickstart.py",
        "preexec_fn=stop_with_parent(os.getpid()),",
        "preexec_fn=None,",
        ["tests/test_quickstart.py", "-k", "killed"],
    ),
    Mutation(
        "problem_example_keeps_a_multi_line_detail",
        "corpora.py",
        'detail = detail.strip().split("\\n", 1)[0]',
        "detail = detail",
        ["tests/test_corpora.py", "-k", "truncated_file_keeps"],
    ),
    Mutation(
        "json_array_escape_cut_by_a_read_is_not_held_back",
        "corpora.py",
        "if not final:  # an escape, or a pair's high half, at the end may go on in the next read",
        "if False:",
        ["tests/test_corpora.py", "-k", "lone_surrogate_escape_are_skipped"],
    ),
    Mutation(
        "json_array_pair_cut_between_its_halves_reads_as_two_lone_ones",
        "corpora.py",
        "if HIGH_SURROGATE_ESCAPE.fullmatch(text, max(0, cut - 6), cut):",
        "if False:",
        ["tests/test_corpora.py", "-k", "lone_surrogate_escape_are_skipped"],
    ),
    Mutation(
        "json_array_item_depth_unbounded",
        "corpora.py",
        "if depth > MAX_JSON_DEPTH + 1:",
        "if False:",
        ["tests/test_corpora.py", "-k", "too_deep_one_is_skipped"],
    ),
    Mutation(
        "data_process_drops_the_old_manifest_before_the_commit",
        "data_process.py",
        "    atomic_write_text(folder / PENDING_MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))",
        '    remove_owned(folder / "manifest.json", folder)\n'
        "    atomic_write_text(folder / PENDING_MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))",
        ["tests/test_data_process.py", "-k", "killed_while_installing"],
    ),
    Mutation(
        "data_process_never_finishes_a_committed_install",
        "data_process.py",
        "        finish_install(folder)  # a run killed after committing its output",
        "        pass",
        ["tests/test_data_process.py", "-k", "killed_while_installing"],
    ),
    Mutation(
        "data_process_lets_a_second_run_write_the_same_out",
        "data_process.py",
        "fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "pass",
        ["tests/test_data_process.py", "-k", "one_run_at_a_time"],
    ),
    Mutation(
        "small_files_one_unit_each",
        "corpora.py",
        "elif pieces and pieces[-1][1] is None and group_bytes + size <= target_bytes:",
        "elif False:",
        ["tests/test_corpora.py", "-k", "grouped", "tests/test_data_process.py", "-k", "same_bytes"],
    ),
    Mutation(
        "grouped_unit_short_documents_named_by_its_first_file",
        "data_process.py",
        "problems.add(reason, labels[number])",
        "problems.add(reason, labels[0])",
        ["tests/test_data_process.py", "-k", "same_bytes"],
    ),
    Mutation(
        "grouped_unit_duplicates_named_by_its_first_file",
        "data_process.py",
        "problems.add(reason, labels[number], count=int(count))",
        "problems.add(reason, labels[0], count=int(count))",
        ["tests/test_data_process.py", "-k", "same_bytes"],
    ),
    Mutation(
        "problem_examples_in_the_order_met",
        "corpora.py",
        "for reason in {**self.skipped, **self.parts_left_out}",
        "for reason in self._examples",
        ["tests/test_data_process.py", "-k", "same_bytes"],
    ),
    Mutation(
        "data_process_spawned_workers_have_no_encoder",
        "data_process.py",
        "None if forked else _init_worker",
        "None",
        ["tests/test_data_process.py", "-k", "spawned_workers"],
    ),
    Mutation(
        "data_process_reads_its_own_output_back",
        "data_process.py",
        "files=files_outside(source.files, out_root)",
        "files=list(source.files)",
        ["tests/test_data_process.py", "-k", "one_run_at_a_time"],
    ),
    Mutation(
        "xml_record_size_leaves_out_attributes",
        "corpora.py",
        "            if attributes:\n",
        "            if False:\n",
        ["tests/test_corpora.py", "-k", "xml_in_an_encoding"],
    ),
    Mutation(
        "pdf_line_end_hyphen_of_a_compound_dropped",
        "corpora.py",
        'return compound if mark == "-" and compound.lower() in compounds else left + right',
        "return left + right",
        ["tests/test_corpora.py", "-k", "pdf"],
    ),
    Mutation(
        "pdf_soft_hyphen_kept_as_a_compound",
        "corpora.py",
        'return compound if mark == "-" and compound.lower() in compounds else left + right',
        "return compound if compound.lower() in compounds else left + right",
        ["tests/test_corpora.py", "-k", "pdf"],
    ),
    Mutation(
        "split_source_stats_files_it_was_given_sizes_of",
        "corpora.py",
        "zip(source.files, sizes or map(os.path.getsize, source.files))",
        "zip(source.files, map(os.path.getsize, source.files))",
        ["tests/test_corpora.py", "-k", "grouped"],
    ),
    Mutation(
        "s2orc_text_equal_to_a_reference_is_body",
        "corpora.py",
        "if not ((index := bisect.bisect_right(starts, start) - 1) >= 0 and reach[index] >= end)",
        "if not ((index := bisect.bisect_right(starts, start) - 1) >= 0 and reach[index] > end)",
        ["tests/test_corpora.py", "-k", "s2orc_text_inside"],
    ),
    Mutation(
        "s2orc_text_straddling_two_figures_is_not_body",
        "corpora.py",
        "if not ((index := bisect.bisect_right(starts, start) - 1) >= 0 and reach[index] >= end)",
        "if not ((index := bisect.bisect_right(starts, end) - 1) >= 0 and reach[index] >= end)",
        ["tests/test_corpora.py", "-k", "s2orc_text_inside"],
    ),
    Mutation(
        "pmc_keeps_headings_over_nothing",
        "corpora.py",
        '            if sum(1 for line in section if line) > 1 or child.find("title") is None:',
        "            if True:",
        ["tests/test_corpora.py", "-k", "headings_over_nothing"],
    ),
    Mutation(
        "pmc_drops_an_untitled_one_paragraph_section",
        "corpora.py",
        'if sum(1 for line in section if line) > 1 or child.find("title") is None:',
        "if sum(1 for line in section if line) > 1:",
        ["tests/test_corpora.py", "-k", "headings_over_nothing"],
    ),
    Mutation(
        "pmc_builds_what_it_never_reads",
        "corpora.py",
        "if depth > 1 and unread is not None and unread(tag, attributes):",
        "if False:",
        ["tests/test_corpora.py", "-k", "never_builds"],
    ),
    Mutation(
        "pmc_text_inside_an_unread_element_kept",
        "corpora.py",
        "    def data(text):\n        if builder is not None and not passing:",
        "    def data(text):\n        if builder is not None:",
        ["tests/test_corpora.py", "-k", "never_builds"],
    ),
    Mutation(
        "pmc_text_after_an_unread_element_lost",
        "corpora.py",
        "            if depth < passing:  # the unread element itself ends",
        "            if depth < 0:",
        ["tests/test_corpora.py", "-k", "never_builds"],
    ),
    Mutation(
        "companion_glob_checks_the_name_alone",
        "corpora.py",
        'regex.match("/".join(components[-depth:]))',
        "regex.match(components[-1])",
        ["tests/test_corpora.py", "-k", "companion"],
    ),
    Mutation(
        "data_process_redoes_sources_whose_manifest_lists_its_files",
        "data_process.py",
        '        if isinstance(manifest["inputs"], list):',
        "        if False:",
        ["tests/test_data_process.py", "-k", "any_change_to_a_folder"],
    ),
    Mutation(
        "data_process_two_sources_share_an_output_folder",
        "data_process.py",
        "    twice = corpora.repeated([source.name for source in sources])",
        "    twice = []",
        ["tests/test_data_process.py", "-k", "named_dot_dot"],
    ),
    Mutation(
        "data_process_follows_no_link_into_its_output",
        "data_process.py",
        "        if os.path.islink(path):",
        "        if False:",
        ["tests/test_data_process.py", "-k", "however_they_are_reached"],
    ),
    Mutation(
        "data_process_input_digest_without_modification_time",
        "data_process.py",
        '{size}\\0{mtime_ns}\\n".encode(',
        '{size}\\n".encode(',
        ["tests/test_data_process.py", "-k", "any_change_to_a_folder"],
    ),
    Mutation(
        "sft_data_process_overwrites_its_input",
        "sft_data_process.py",
        "        if path.resolve() in inputs:",
        "        if False:",
        ["tests/test_sft.py", "-k", "out_errors"],
    ),
    Mutation(
        "xml_in_a_multibyte_encoding_is_not_decoded",
        "corpora.py",
        "decoder = xml_transcoder(chunk)",
        "decoder = None",
        ["tests/test_corpora.py", "-k", "xml_in_an_encoding"],
    ),
    Mutation(
        "xml_record_size_unbounded",
        "corpora.py",
        "if size > MAX_RECORD_CHARS:",
        "if False:",
        ["tests/test_corpora.py", "-k", "xml_in_an_encoding"],
    ),
    Mutation(
        "xml_file_without_records_passes_silently",
        "corpora.py",
        "if complete and not found and (span is None or not span.start):",
        "if False:",
        ["tests/test_corpora.py", "-k", "xml_in_an_encoding"],
    ),
    Mutation(
        "jats_alternatives_both_kept",
        "corpora.py",
        'if element.tag == "alternatives" and len(element):',
        "if False:",
        ["tests/test_corpora.py", "-k", "inline_markup"],
    ),
    Mutation(
        "s2orc_first_abstract_span_only",
        "corpora.py",
        'head = spans["title"][:1] + spans["abstract"]',
        'head = spans["title"][:1] + spans["abstract"][:1]',
        ["tests/test_corpora.py", "-k", "s2orc_every_abstract_span"],
    ),
    Mutation(
        "s2orc_overlapping_spans_repeat_text",
        "corpora.py",
        "if not body or span[0] >= body[-1][1]:",
        "if True:",
        ["tests/test_corpora.py", "-k", "s2orc_every_abstract_span"],
    ),
    Mutation(
        "pdf_numbered_text_taken_for_page_furniture",
        "corpora.py",
        "if same or paging:",
        "if True:",
        ["tests/test_corpora.py", "-k", "pdf_running_lines"],
    ),
    Mutation(
        "json_array_big_integer_loses_the_rest",
        "corpora.py",
        'if backend is ijson and "integer overflow" in detail:',
        "if False:",
        ["tests/test_corpora.py", "-k", "overflow_real"],
    ),
    Mutation(
        "file_encoding_sniffed_by_bytes_not_lines",
        "corpora.py",
        "return vote_encoding(head) or detect_encoding(head)",
        "return detect_encoding(head)",
        ["tests/test_corpora.py", "-k", "big5"],
    ),
    Mutation(
        "gb18030_private_use_taken_as_text",
        "corpora.py",
        "return None if text is None or PRIVATE_USE.search(text) else text",
        "return text",
        ["tests/test_corpora.py", "-k", "big5"],
    ),
    Mutation(
        "existing_path_taken_as_a_glob",
        "corpora.py",
        "if os.path.exists(location):  # a real name",
        'if os.path.exists(location) and "[" not in location:  # a real name',
        ["tests/test_corpora.py", "-k", "glob_and_folder"],
    ),
    Mutation(
        "csv_header_naming_a_column_twice_passes",
        "corpora.py",
        "if twice:  # a row would keep only the last of them, silently",
        "if False:",
        ["tests/test_corpora.py", "-k", "column_twice"],
    ),
    Mutation(
        "overlong_line_held_whole",
        "corpora.py",
        "            if len(rest) > MAX_LINE_BYTES:\n                overlong = True",
        "            if False:\n                overlong = True",
        ["tests/test_corpora.py", "-k", "overlong_lines"],
    ),
    Mutation(
        "overlong_line_inside_a_block_read",
        "corpora.py",
        "    if len(block) <= MAX_LINE_BYTES:\n        yield block\n        return",
        "    yield block\n    return",
        ["tests/test_corpora.py", "-k", "overlong_lines"],
    ),
    Mutation(
        "overlong_text_line_ends_its_block_uncounted",
        "corpora.py",
        "if line.strip() or line_problem:",
        "if line.strip():",
        ["tests/test_corpora.py", "-k", "overlong_lines"],
    ),
    Mutation(
        "plain_text_lone_cr_is_one_line",
        "corpora.py",
        "for lineno, line, line_problem in _cr_lines(read_lines(path, problems, span)):",
        "for lineno, line, line_problem in read_lines(path, problems, span):",
        ["tests/test_corpora.py", "-k", "lone_cr"],
    ),
    Mutation(
        "pmc_vqa_v2_letter_read_as_choice_text",
        "corpora.py",
        'if "Answer_label" not in record and answer.upper() in ("A", "B", "C", "D"):',
        "if False:",
        ["tests/test_vlm.py", "-k", "bad_records_are_counted_not_fatal"],
    ),
    Mutation(
        "vqa_option_text_starting_with_a_read_as_letter_a",
        "eval.py",
        "by_text = next(",
        "by_text = '' and next(",
        ["tests/test_vlm.py", "-k", "scoring"],
    ),
    Mutation(
        "cmexam_repeated_letter_overwrites",
        "corpora.py",
        "        if match[1] in options:",
        "        if False:",
        ["tests/test_corpora.py", "-k", "cmmlu_cmb_cmexam"],
    ),
    Mutation(
        "csv_unit_stops_inside_a_row",
        "corpora.py",
        "                span.read_to_end = True  # a row",
        "                return  # a row",
        ["tests/test_corpora.py", "-k", "cut_inside"],
    ),
    Mutation(
        "json_array_scan_escapes_with_any_backslash_run",
        "corpora.py",
        "backslash[:-1] & (run[:-1] % 2 == 1)",
        "backslash[:-1] & (run[:-1] >= 1)",
        ["tests/test_corpora.py", "-k", "json_array_pieces_read"],
    ),
    Mutation(
        "json_array_scan_forgets_backslashes_at_a_piece_end",
        "corpora.py",
        "int(run[-1]) if ends_in_run else 0",
        "0",
        ["tests/test_corpora.py", "-k", "json_array_pieces_read"],
    ),
    Mutation(
        "json_array_split_when_not_utf8",
        "corpora.py",
        "                decoder.decode(piece)\n            except UnicodeDecodeError:\n                return None",
        "                decoder.decode(piece)\n            except UnicodeDecodeError:\n                pass",
        ["tests/test_corpora.py", "-k", "read_whole_unless"],
    ),
    Mutation(
        "json_array_cut_beside_an_empty_item",
        "corpora.py",
        " or not all(_item_on_both_sides(f, c) for c, _ in cuts):",
        ":",
        ["tests/test_corpora.py", "-k", "read_whole_unless"],
    ),
    Mutation(
        "json_array_split_with_bytes_after_it",
        "corpora.py",
        "if closing is None or _next_byte(f, closing + 1) or",
        "if closing is None or",
        ["tests/test_corpora.py", "-k", "read_whole_unless"],
    ),
    Mutation(
        "json_array_span_numbered_from_zero",
        "corpora.py",
        "enumerate(_array_items(reader, backend), first)",
        "enumerate(_array_items(reader, backend))",
        ["tests/test_corpora.py", "-k", "json_array_pieces_read"],
    ),
    Mutation(
        "json_array_span_malformed_leaves_later_spans",
        "corpora.py",
        "            if span:\n                span.read_to_end = True\n",
        "",
        ["tests/test_corpora.py", "-k", "malformed_in_one_piece"],
    ),
    Mutation(
        "xml_span_stops_at_any_start_tag_match",
        "corpora.py",
        "                if not agreed(at):",
        "                if False:",
        ["tests/test_corpora.py", "-k", "fool_the_bytes"],
    ),
    Mutation(
        "xml_span_head_not_checked",
        "corpora.py",
        "else 0 if not span.start else span.end",
        "else span.end",
        ["tests/test_corpora.py", "-k", "fool_the_bytes"],
    ),
    Mutation(
        "xml_span_ignores_the_elements_around_a_record",
        "corpora.py",
        " and tuple(outer) == record_outer",
        "",
        ["tests/test_corpora.py", "-k", "fool_the_bytes"],
    ),
    Mutation(
        "xml_span_lines_counted_from_its_start",
        "corpora.py",
        'shift, moved = lines - head.count(b"\\n"), offset - len(head)',
        "shift, moved = 0, offset - len(head)",
        ["tests/test_corpora.py", "-k", "xml_pieces_read_exactly"],
    ),
    Mutation(
        "xml_span_malformed_leaves_later_spans",
        "corpora.py",
        "expat.errors.messages[err.code])\n        if span is not None:\n            span.read_to_end = True",
        "expat.errors.messages[err.code])",
        ["tests/test_corpora.py", "-k", "xml_malformed_in_one_piece"],
    ),
    Mutation(
        "xml_gzip_spans_unbounded",
        "corpora.py",
        "count = min(count, gzip_spans) if gzipped else count",
        "count = count",
        ["tests/test_corpora.py", "-k", "xml_pieces_read_exactly"],
    ),
    Mutation(
        "csv_units_cut_inside_rows_kept",
        "data_process.py",
        "                if unit.files[0] == void_file:",
        "                if False:",
        ["tests/test_data_process.py", "-k", "same_bytes"],
    ),
    Mutation(
        "gb18030_block_reads_utf8_lines_as_gb",
        "corpora.py",
        "self.decode(block[start:end])]",
        "block[start:end].decode('gb18030')]",
        ["tests/test_corpora.py", "-k", "decode_as_their"],
    ),
    Mutation(
        "lora_b_starts_nonzero",
        "lora.py",
        "nn.init.zeros_(self.lora_B.weight)",
        "nn.init.normal_(self.lora_B.weight, std=0.02)",
        ["tests/test_lora.py", "-k", "start_as_the_base"],
    ),
    Mutation(
        "lora_scaled_by_alpha_alone",
        "lora.py",
        "self.scaling = alpha / rank",
        "self.scaling = alpha",
        ["tests/test_lora.py", "-k", "scaling"],
    ),
    Mutation(
        "lora_peft_config_alpha_wrong",
        "lora.py",
        '"lora_alpha": settings["alpha"],',
        '"lora_alpha": settings["alpha"] * 2,',
        ["tests/test_lora.py", "-k", "peft_on_the_export"],
    ),
    Mutation(
        "lora_peft_names_swap_gate_and_up",
        "lora.py",
        'return f"base_model.model.model.layers.{layer}.{LAYER_NAMES[module]}.lora_{matrix}"',
        "return f\"base_model.model.model.layers.{layer}.{LAYER_NAMES[{'feed_forward.w1': 'feed_forward.w3', "
        "'feed_forward.w3': 'feed_forward.w1'}.get(module, module)]}.lora_{matrix}\"",
        ["tests/test_lora.py", "-k", "peft_on_the_export"],
    ),
    Mutation(
        "lora_merge_without_scaling",
        "lora.py",
        "delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling",
        "delta = self.lora_B.weight.float() @ self.lora_A.weight.float()",
        ["tests/test_lora.py", "-k", "merge_lora_agree"],
    ),
    Mutation(
        "lora_adapter_applied_to_any_base",
        "lora.py",
        'if base is not None and "base_step" in metadata:',
        "if False:",
        ["tests/test_lora.py", "-k", "another_model"],
    ),
    Mutation(
        "lora_checkpoint_holds_frozen_weights",
        "sft.py",
        "trainer = Trainer(model, cfg, d, tok.fingerprint, run_id, trained_dtype, meta, trained_only=bool(settings))",
        "trainer = Trainer(model, cfg, d, tok.fingerprint, run_id, trained_dtype, meta, trained_only=False)",
        ["tests/test_lora.py", "-k", "resumes_bit_exactly"],
    ),
    Mutation(
        "lora_vlm_checkpoint_holds_frozen_weights",
        "vlm_train.py",
        "trainer = Trainer(model, cfg, d, tok.fingerprint, run_id, trained_dtype, meta, trained_only=bool(settings))",
        "trainer = Trainer(model, cfg, d, tok.fingerprint, run_id, trained_dtype, meta, trained_only=False)",
        ["tests/test_vlm.py", "-k", "resume_is_bit"],
    ),
    Mutation(
        "lora_changed_base_not_noticed",
        "checkpoint.py",
        'if (now["run_id"], now["step"]) != (record["run_id"], record["step"]):',
        "if False:",
        ["tests/test_lora.py", "-k", "resumes_bit_exactly"],
    ),
    Mutation(
        "lora_adapter_ignored_by_eval_ppl",
        "eval.py",
        'model, tok, ckpt, _ = load(args.ckpt, args.tokenizer, args.device, args.dtype, "score", args.adapter)',
        'model, tok, ckpt, _ = load(args.ckpt, args.tokenizer, args.device, args.dtype, "score")',
        ["tests/test_lora.py", "-k", "command_lines"],
    ),
    Mutation(
        "dpo_label_smoothing_sign",
        "dpo.py",
        "- label_smoothing * F.logsigmoid(-margin)",
        "+ label_smoothing * F.logsigmoid(-margin)",
        ["tests/test_dpo.py", "-k", "hand_computation"],
    ),
    Mutation(
        "dpo_chosen_and_rejected_references_swapped",
        "dpo.py",
        "reference_chosen, reference_rejected = self.reference_logps(x, y).chunk(2)",
        "reference_rejected, reference_chosen = self.reference_logps(x, y).chunk(2)",
        ["tests/test_dpo.py", "-k", "independent_computation"],
    ),
    Mutation(
        "dpo_context_tokens_scored",
        "dpo.py",
        "is_answer = [False] * len(context_ids) + [True] * (len(ids) - len(context_ids))",
        "is_answer = [True] * len(ids)",
        ["tests/test_dpo.py", "-k", "share_their_context"],
    ),
    Mutation(
        "dpo_pair_cut_for_the_shorter_answer",
        "dpo.py",
        "fit_turns(history + [(prompt, max(chosen, rejected, key=len))], self.seq_len + 1)",
        "fit_turns(history + [(prompt, min(chosen, rejected, key=len))], self.seq_len + 1)",
        ["tests/test_dpo.py", "-k", "share_their_context"],
    ),
    Mutation(
        "dpo_metrics_of_one_rank",
        "trainer.py",
        "self.step_metrics = {name: self.dist.all_sum(value) / max(tokens, 1) for name, value in sums.items()}",
        "self.step_metrics = {name: value * self.dist.world / max(tokens, 1) for name, value in sums.items()}",
        ["tests/test_dpo.py", "-k", "ddp and 0"],
    ),
    Mutation(
        "dpo_loss_normalised_by_tokens_not_pairs",
        "trainer.py",
        'self.units = getattr(model, "units", target_tokens)',
        "self.units = target_tokens",
        ["tests/test_dpo.py", "-k", "ddp and 0"],
    ),
    Mutation(
        "dpo_lora_reference_keeps_adapters",
        "dpo.py",
        "with lora.disabled(self.policy):",
        "with torch.no_grad():",
        ["tests/test_dpo.py", "-k", "ddp and 4"],
    ),
    Mutation(
        "dpo_margin_sign_flipped",
        "dpo.py",
        "margin = chosen_rewards - rejected_rewards",
        "margin = rejected_rewards - chosen_rewards",
        ["tests/test_dpo.py", "-k", "reward_accuracy_rises"],
    ),
    Mutation(
        "dpo_resume_without_optimizer_state",
        "parallel.py",
        'optimizer.load_state_dict(ckpt["optimizer"])',
        "pass",
        ["tests/test_dpo.py", "-k", "dpo_resumes"],
    ),
    Mutation(
        "dpo_resumed_reference_is_the_trained_policy",
        "dpo.py",
        'base = check_base(meta["base"]) if resume else source',
        "base = source",
        ["tests/test_dpo.py", "-k", "dpo_resumes and 0"],
    ),
    Mutation(
        "dpo_zero_beta_accepted",
        "dpo.py",
        'if not 0 < cfg["beta"] < math.inf:',
        'if not cfg["beta"] < math.inf:',
        ["tests/test_dpo.py", "-k", "bad_dpo_settings"],
    ),
    Mutation(
        "dpo_preference_answer_appended_to_an_answer",
        "corpora.py",
        'if not messages or ROLES.get(str(messages[-1][0]).strip().lower()) != "user":',
        "if not messages:",
        ["tests/test_dpo.py", "-k", "readers"],
    ),
    Mutation(
        "record_parts_counted_as_skipped_records",
        "corpora.py",
        "(self.parts if part else self.counts)[reason] += count",
        "self.counts[reason] += count",
        ["tests/test_sft.py", "-k", "summary_counts"],
    ),
    Mutation(
        "unparsed_records_not_counted_as_read",
        "corpora.py",
        "        self.records += 1\n        self.add(reason, file, line, detail)",
        "        self.add(reason, file, line, detail)",
        ["tests/test_sft.py", "-k", "round_trips"],
    ),
    Mutation(
        "lone_surrogate_reaches_the_encoder",
        "corpora.py",
        'if "\\\\u" in line and holds_surrogate(record):',
        "if False:",
        ["tests/test_data_process.py", "-k", "surrogate"],
    ),
    Mutation(
        "adapter_with_nan_matrices_is_merged",
        "lora.py",
        "if not torch.isfinite(tensors[name]).all():",
        "if False:",
        ["tests/test_lora.py", "-k", "damaged"],
    ),
    Mutation(
        "infinite_lora_alpha_is_accepted",
        "lora.py",
        "    if not 0 < alpha < math.inf:\n",
        "    if not 0 < alpha:\n",
        ["tests/test_lora.py", "-k", "bad_lora_settings"],
    ),
    Mutation(
        "text_fine_tuning_starts_from_a_vlm",
        "checkpoint.py",
        '    if "vision" in meta.get("model_args", {}):\n        raise CheckpointError(',
        "    if False:\n        raise CheckpointError(",
        ["tests/test_dpo.py", "-k", "vision_language"],
    ),
    Mutation(
        "infinite_dpo_beta_is_accepted",
        "dpo.py",
        'if not 0 < cfg["beta"] < math.inf:',
        'if not 0 < cfg["beta"]:',
        ["tests/test_dpo.py", "-k", "bad_dpo_settings"],
    ),
    Mutation(
        "server_encodes_lone_surrogates",
        "serve.py",
        "        if holds_surrogate(body):",
        "        if False:",
        ["tests/test_serve.py", "-k", "request_errors"],
    ),
    Mutation(
        "deeply_nested_json_raises_recursion_error",
        "corpora.py",
        "    except RecursionError:\n",
        "    except ZeroDivisionError:\n",
        ["tests/test_corpora.py", "-k", "nested", "tests/test_serve.py", "-k", "request_errors"],
    ),
    Mutation(
        "huge_json_integer_raises_value_error",
        "corpora.py",
        '    except ValueError as err:\n        raise json.JSONDecodeError(str(err), "", 0) from None\n',
        "",
        ["tests/test_corpora.py", "-k", "nested"],
    ),
    Mutation(
        "checkpoint_with_nan_weights_is_loaded",
        "checkpoint.py",
        "    if damaged:\n        raise CheckpointError(",
        "    if False:\n        raise CheckpointError(",
        ["tests/test_export.py", "-k", "nan"],
    ),
    Mutation(
        "history_trimmed_one_turn_at_a_time",
        "serve.py",
        "dropped = bisect.bisect_left(range(len(pairs) + 1), True, key=lambda d: len(render(pairs[d:])) <= budget)",
        "dropped = next((d for d in range(len(pairs) + 1) if len(render(pairs[d:])) <= budget), len(pairs) + 1)",
        ["tests/test_serve.py", "-k", "trimming or context_overflow"],
    ),
    Mutation(
        "prompt_cut_without_a_note",
        "chat.py",
        "    if length <= budget:\n        return None\n",
        "    return None\n",
        ["tests/test_chat.py", "-k", "start_was_cut"],
    ),
    Mutation(
        "resume_on_other_rows_accepted",
        "dataset_sft.py",
        "if trained_on not in (None, self.fingerprint):",
        "if False:",
        ["tests/test_trainer.py", "-k", "changed_csv", "tests/test_dpo.py", "-k", "other_data"],
    ),
    Mutation(
        "vqa_question_placeholders_kept",
        "corpora.py",
        "    if IMAGE_PLACEHOLDER in question or IMAGE_PLACEHOLDER in answer:",
        "    if False:",
        ["tests/test_vlm.py", "-k", "placeholders_is_skipped"],
    ),
    Mutation(
        "resume_with_other_rows_per_step_accepted",
        "trainer.py",
        "        if saved is None or saved == self.rows_per_step:\n            return\n",
        "        return\n",
        ["tests/test_trainer.py", "-k", "rows_a_step"],
    ),
    Mutation(
        "non_finite_loss_is_a_traceback",
        "pretrain.py",
        "    except (CheckpointError, DataError, LogError, OSError, NonFiniteLoss) as err:",
        "    except (CheckpointError, DataError, LogError, OSError) as err:",
        ["tests/test_pretrain.py", "-k", "non_finite"],
    ),
    Mutation(
        "nan_stop_names_a_checkpoint_that_does_not_exist",
        "trainer.py",
        "                        if Path(ckpt_path).exists()\n",
        "                        if True\n",
        ["tests/test_pretrain.py", "-k", "non_finite"],
    ),
    Mutation(
        "mcq_few_shots_blamed_on_max_seq_len",
        "eval.py",
        """pool = f", {r['shots_available']:.1f} in the shot pool" if r["shots_available"] < shots else \"\"""",
        'pool = ""',
        ["tests/test_eval.py", "-k", "small_pool"],
    ),
    Mutation(
        "gpu_check_out_checked_only_at_the_end",
        "gpu_check.py",
        "        check_out(args.out, folder=True)  # the report",
        "        (args.out, True)  # the report",
        ["tests/test_gpu_check.py", "-k", "out_that_is_a_file"],
    ),
    Mutation(
        "pretrain_resume_past_stop_at_is_silent",
        "pretrain.py",
        """    if cfg["stop_at"] and trainer.step >= cfg["stop_at"]:\n        if d.is_master:""",
        """    if False:\n        if d.is_master:""",
        ["tests/test_pretrain.py", "-k", "past_stop_at"],
    ),
    Mutation(
        "ceval_options_beyond_d_silently_dropped",
        "corpora.py",
        """    if extra:\n        raise BadRecord("option columns beyond D""",
        """    if False:\n        raise BadRecord("option columns beyond D""",
        ["tests/test_corpora.py", "-k", "beyond_d"],
    ),
    Mutation(
        "tokenizer_too_small_vocab_keeps_sentencepiece_advice",
        "train_tokenizer.py",
        "        if needed:  # its advice",
        "        if False:  # its advice",
        ["tests/test_tokenizer.py", "-k", "too_small"],
    ),
    Mutation(
        "lora_run_checkpoint_advice_names_a_missing_flag",
        "checkpoint.py",
        "--out merged.pt (chat.py, eval.py and ",
        "(chat.py, eval.py and ",
        ["tests/test_lora.py", "-k", "points_to_merge_lora"],
    ),
    Mutation(
        "unknown_source_name_advises_a_missing_flag",
        "corpora.py",
        'name it after its format, FORMAT or FORMAT_anything "\n',
        'name it after a format or pass --format "\n',
        ["tests/test_corpora.py", "-k", "parse_source_errors"],
    ),
    Mutation(
        "quickstart_runs_stages_from_the_callers_folder",
        "quickstart.py",
        "    os.chdir(ROOT)\n",
        "",
        ["tests/test_quickstart.py", "-k", "smoke_runs"],
    ),
    Mutation(
        "quickstart_ctrl_c_is_a_traceback",
        "quickstart.py",
        "            except KeyboardInterrupt:  # Ctrl-C",
        "            except ZeroDivisionError:  # Ctrl-C",
        ["tests/test_quickstart.py", "-k", "ctrl_c"],
    ),
    Mutation(
        "pretrain_claim_failure_kills_other_ranks_in_the_broadcast",
        "pretrain.py",
        """run_id = d.from_master(lambda: start_run(out, cfg["overwrite"], "pretrain.py"))""",
        """run_id = d.broadcast(start_run(out, cfg["overwrite"], "pretrain.py") if d.is_master else None)""",
        ["tests/test_pretrain.py", "-k", "refused_out_dir_under_torchrun"],
    ),
    Mutation(
        "generate_finds_a_damaged_checkpoint_after_the_others_answered",
        "eval.py",
        "        checkpoint_meta(path)\n    runs = []",
        "        pass\n    runs = []",
        ["tests/test_eval.py", "-k", "checks_every_checkpoint"],
    ),
    Mutation(
        "fast_bpe_ties_go_to_the_right",
        "chatglm_tokenizer/fast_bpe.c",
        "(a->score == b->score && a->left < b->left)",
        "(a->score == b->score && a->left > b->left)",
        ["tests/test_fast_bpe.py"],
    ),
    Mutation(
        "fast_bpe_stale_pairs_merge",
        "chatglm_tokenizer/fast_bpe.c",
        "if (l->len == 0 || r->len == 0 || l->len + r->len != top.len) continue;",
        "if (l->len == 0 || r->len == 0) continue;",
        ["tests/test_fast_bpe.py"],
    ),
    Mutation(
        "fast_bpe_runs_cut_between_characters_a_piece_joins",
        "chatglm_tokenizer/fast_bpe.c",
        "    if (left < 0 || right < 0) return 0;\n    uint64_t bit",
        "    if (left < 0 || right < 0 || left != right) return 0;\n    uint64_t bit",
        ["tests/test_fast_bpe.py"],
    ),
    Mutation(
        "fast_bpe_byte_fallback_repeats_the_first_byte",
        "chatglm_tokenizer/fast_bpe.c",
        "out[written++] = m->byte_ids[(uint8_t)w->text[s->start + b]];",
        "out[written++] = m->byte_ids[(uint8_t)w->text[s->start]];",
        ["tests/test_fast_bpe.py"],
    ),
    Mutation(
        "fast_bpe_one_unk_per_unknown_character",
        "chatglm_tokenizer/fast_bpe.c",
        "if (!previous_unknown) out[written++] = m->unk_id;",
        "out[written++] = m->unk_id;",
        ["tests/test_fast_bpe.py"],
    ),
    Mutation(
        "fast_bpe_utf8_surrogates_read_as_characters",
        "chatglm_tokenizer/fast_bpe.c",
        "c >= 0x800 && (c < 0xD800 || c >= 0xE000))",
        "c >= 0x800)",
        ["tests/test_fast_bpe.py", "-k", "sentencepiece_ids and not chatglm2"],
    ),
    Mutation(
        "fast_bpe_a_piece_split_only_after_its_first_character",
        "chatglm_tokenizer/fast_bpe.py",
        "        for k in range(1, len(piece))\n",
        "        for k in range(1, min(2, len(piece)))\n",
        ["tests/test_fast_bpe.py"],
    ),
    Mutation(
        "fast_bpe_used_without_the_probe_check",
        "chatglm_tokenizer/fast_bpe.py",
        """raise ValueError("its ids differ from SentencePiece's on a probe text")""",
        "pass",
        ["tests/test_fast_bpe.py", "-k", "disagree"],
    ),
    Mutation(
        "fast_bpe_table_cache_shared_by_every_model",
        "chatglm_tokenizer/fast_bpe.py",
        'name = f"tables-{code_version()}-{hashlib.sha256(serialized).hexdigest()[:16]}.npz"',
        'name = f"tables-{code_version()}.npz"',
        ["tests/test_fast_bpe.py"],
    ),
    Mutation(
        "fast_bpe_builds_only_in_the_checkout",
        "chatglm_tokenizer/fast_bpe.py",
        'return [BUILD] + ([] if cache.startswith("~")',
        "return [BUILD] + ([] if True",
        ["tests/test_fast_bpe.py", "-k", "cannot_be_written"],
    ),
    Mutation(
        "fast_bpe_threads_return_parts_out_of_order",
        "chatglm_tokenizer/fast_bpe.py",
        "parts = list(pool.map(self.encode, [texts[a:b] for a, b in zip(bounds, bounds[1:])]))",
        "parts = list(pool.map(self.encode, [texts[a:b] for a, b in zip(bounds, bounds[1:])]))[::-1]",
        ["tests/test_fast_bpe.py", "-k", "threads"],
    ),
    Mutation(
        "fast_bpe_tokenizer_cannot_be_pickled",
        "chatglm_tokenizer/fast_bpe.py",
        "    def __getstate__(self):",
        "    def _getstate(self):",
        ["tests/test_fast_bpe.py", "-k", "pickled"],
    ),
    Mutation(
        "fast_bpe_encodes_texts_past_its_32_bit_positions",
        "chatglm_tokenizer/fast_bpe.py",
        "        if data and max(map(len, data)) > MAX_TEXT_BYTES:",
        "        if False:",
        ["tests/test_fast_bpe.py", "-k", "too_long"],
    ),
    Mutation(
        "fast_bpe_no_second_try_when_the_ids_outgrow_the_bytes",
        "chatglm_tokenizer/fast_bpe.py",
        "for room in (len(joined) + 3 * len(data), 3 * len(joined) + 3 * len(data)):",
        "for room in (len(joined) + 3 * len(data),):",
        ["tests/test_fast_bpe.py", "-k", "more_ids_than_bytes"],
    ),
]


def copy_repository(destination):
    """The working tree as git sees it (tracked and untracked-not-ignored files), without .venv and out/."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run(mutation, scratch):
    """'caught', 'escaped' or 'does not apply', and the seconds it took."""
    path = scratch / mutation.file
    original = path.read_text(encoding="utf-8")
    if original.count(mutation.old) != 1:
        return f"does not apply ({original.count(mutation.old)} matches in {mutation.file})", 0.0
    path.write_text(original.replace(mutation.old, mutation.new), encoding="utf-8")
    start = time.time()
    try:
        groups, current = [], []
        for item in mutation.tests:  # "file", "-k", "expr", "file2" ... -> one pytest run per file
            if item.startswith("tests/") and current:
                groups.append(current)
                current = []
            current.append(item)
        groups.append(current)
        caught = False
        for group in groups:
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *group],
                cwd=scratch,
                capture_output=True,
                text=True,
            )
            if result.returncode == 5:  # no test collected: the -k filter matches nothing any more
                return f"does not apply (no test selected by {' '.join(group)})", time.time() - start
            caught = caught or result.returncode != 0
            if caught:
                break
        return ("caught" if caught else "escaped"), time.time() - start
    finally:
        path.write_text(original, encoding="utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:48s} {m.file:18s} {' '.join(m.tests)}")
        return
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        scratch = Path(tmp) / ROOT.name
        copy_repository(scratch)
        if (ROOT.parent / "shared").is_dir():  # the tests look for the real tokenizer in ../shared
            (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")
        for m in chosen:
            outcome, seconds = run(m, scratch)
            outcomes.append((m, outcome))
            print(f"{m.name:48s} {outcome:12s} {seconds:6.0f} s  ({m.file}; {' '.join(m.tests)})", flush=True)
    caught = sum(o == "caught" for _, o in outcomes)
    escaped = sum(o == "escaped" for _, o in outcomes)
    broken = len(outcomes) - caught - escaped
    print(f"{caught} caught, {escaped} escaped" + (f", {broken} do not apply" if broken else ""))
    sys.exit(1 if escaped or broken else 0)


if __name__ == "__main__":
    main()
