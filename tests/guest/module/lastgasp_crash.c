// SPDX-License-Identifier: GPL-2.0
/*
 * Crashes the kernel on request, for lastgasp's VM tests: Debian's kernels have no LKDTM.
 * Write one word to /proc/lastgasp_crash:
 *   null  dereferences a NULL pointer (an oops; a panic with panic_on_oops=1)
 *   bug   BUG() (an invalid opcode oops; a panic with panic_on_oops=1)
 *   warn  WARN_ON(1) (a panic with panic_on_warn=1)
 *   hang  sleeps uninterruptibly forever (a panic with hung_task_panic=1)
 * Each crash happens in its own noinline function, so the call trace names it.
 */
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/sched.h>
#include <linux/string.h>
#include <linux/uaccess.h>

/* A store, and no return value: gcc would clone a function whose result is unused into one
 * without the load (lastgasp_crash_null_deref.isra.0, which does nothing). */
static noinline void lastgasp_crash_null_deref(void)
{
	int *volatile pointer = NULL;

	*pointer = 1;
}

static noinline void lastgasp_crash_bug(void)
{
	BUG();
}

static noinline void lastgasp_crash_warn(void)
{
	WARN_ON(1);
}

static noinline void lastgasp_crash_hang(void)
{
	for (;;) {
		set_current_state(TASK_UNINTERRUPTIBLE);
		schedule();
	}
}

static ssize_t lastgasp_crash_write(struct file *file, const char __user *buffer,
				    size_t count, loff_t *position)
{
	char word[16] = {};

	if (copy_from_user(word, buffer, min(count, sizeof(word) - 1)))
		return -EFAULT;
	strim(word);
	pr_info("lastgasp_crash: %s\n", word);
	if (!strcmp(word, "null"))
		lastgasp_crash_null_deref();
	else if (!strcmp(word, "bug"))
		lastgasp_crash_bug();
	else if (!strcmp(word, "warn"))
		lastgasp_crash_warn();
	else if (!strcmp(word, "hang"))
		lastgasp_crash_hang();
	else
		return -EINVAL;
	return count;
}

static const struct proc_ops lastgasp_crash_ops = {
	.proc_write = lastgasp_crash_write,
};

static int __init lastgasp_crash_init(void)
{
	if (!proc_create("lastgasp_crash", 0200, NULL, &lastgasp_crash_ops))
		return -ENOMEM;
	return 0;
}

static void __exit lastgasp_crash_exit(void)
{
	remove_proc_entry("lastgasp_crash", NULL);
}

module_init(lastgasp_crash_init);
module_exit(lastgasp_crash_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Crashes the kernel on request, for lastgasp's VM tests");
