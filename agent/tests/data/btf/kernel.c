/* SPDX-License-Identifier: Apache-2.0 */
/*
 * A small stand-in for a kernel's BTF, for the unit tests of agent/src/agent/btf.rs: every
 * struct and member kernel_offsets() resolves, at the offsets of an x86_64 6.18 kernel,
 * with the shapes the parser must see through (anonymous structs and unions, a member path
 * through a nested struct, bitfields, typedefs, an enum, arrays, a flexible array) and
 * clang's names of the integer types ("unsigned long", where GCC says "long unsigned int").
 * Fields the agent does not read are left out or stand in as __pad arrays.
 *
 * kernel.btf is this file's .BTF section. To regenerate it, from the repository root:
 *
 *   clang -g -O2 -target bpfel -c agent/tests/data/btf/kernel.c -o /tmp/kernel.o
 *   llvm-objcopy --dump-section .BTF=agent/tests/data/btf/kernel.btf /tmp/kernel.o
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct list_head {
	struct list_head *next, *prev;
};

struct thread_info {
	unsigned long flags;
	unsigned long syscall_work;
	u32 status;
	u32 cpu;
};

struct mm_struct {
	struct {
		char __pad0[480];
		unsigned long arg_start;	/* 480 */
		unsigned long arg_end;		/* 488 */
		unsigned long env_start;	/* 496 */
		unsigned long env_end;		/* 504 */
	};
	unsigned long cpu_bitmap[];
};

struct file {
	int f_lock;
	unsigned int f_mode;
	const void *f_op;
	void *f_mapping;
	void *private_data;			/* 24 */
};

struct fdtable {
	unsigned int max_fds;			/* 0 */
	struct file **fd;			/* 8 */
	unsigned long *close_on_exec;
	unsigned long *open_fds;
};

struct files_struct {
	int count;
	_Bool resize_in_progress;
	struct {
		int lock;
		struct list_head head;
	} resize_wait;
	struct fdtable *fdt;		/* 32 */
};

struct task_struct {
	struct thread_info thread_info;
	unsigned int __state;
	char __pad0[1136 - 28];
	struct mm_struct *mm;			/* 1136 */
	struct mm_struct *active_mm;		/* 1144 */
	void *faults_disabled_mapping;
	int exit_state;
	int exit_code;				/* 1164 */
	int exit_signal;
	int pdeath_signal;
	unsigned long jobctl;
	unsigned int personality;		/* 1184 */
	unsigned sched_reset_on_fork:1;		/* 1188, bit 0 */
	unsigned sched_contributes_to_load:1;
	unsigned sched_migrated:1;
	char __pad1[1824 - 1192];
	struct files_struct *files;		/* 1824 */
};

typedef enum {
	SS_FREE = 0,
	SS_UNCONNECTED,
	SS_CONNECTING,
	SS_CONNECTED,
	SS_DISCONNECTING,
} socket_state;

struct sock;

struct socket {
	socket_state state;
	short type;
	unsigned long flags;
	struct file *file;			/* 16 */
	struct sock *sk;			/* 24 */
	const void *ops;
};

struct sock_common {
	union {
		u64 skc_addrpair;
		struct {
			u32 skc_daddr;
			u32 skc_rcv_saddr;
		};
	};
	union {
		unsigned int skc_hash;
		u16 skc_u16hashes[2];
	};
	union {
		u32 skc_portpair;
		struct {
			u16 skc_dport;
			u16 skc_num;
		};
	};
	unsigned short skc_family;		/* 16 */
	char __pad0[136 - 18];
};

struct sock {
	struct sock_common __sk_common;
	char __pad0[528 - 136];
	u8 sk_gso_disabled:1,
	   sk_kern_sock:1,
	   sk_no_check_tx:1,
	   sk_no_check_rx:1;
	u8 sk_shutdown;
	u16 sk_type;				/* 530 */
	u16 sk_protocol;			/* 532 */
};

struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8;
	unsigned long ax, cx, dx, si;
	unsigned long di;			/* 112 */
	unsigned long orig_ax;			/* 120 */
	unsigned long ip, cs, flags, sp, ss;
};

/* Globals, so that every type above is emitted. */
struct task_struct task;
struct files_struct files;
struct fdtable fdtable;
struct file file;
struct socket socket;
struct sock sock;
struct mm_struct mm;
struct pt_regs regs;
